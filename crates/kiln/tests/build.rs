//! `kiln build` against the reference tools: sgdisk, e2fsck, fsck.erofs, fsck.fat, veritysetup,
//! systemd-repart and systemd-dissect; reproducibility; spec and budget errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::{require_tool, run, run_ok, tool, CorpusOptions};
use serde_json::Value;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Builds `spec_text` (written as DIR/kiln.toml) from `source` into DIR/out; returns the report.
fn build(dir: &Path, spec_text: &str, source: &Path) -> Value {
    fs::write(dir.join("kiln.toml"), spec_text).unwrap();
    let out = run_ok(
        kiln()
            .arg("build")
            .arg(dir)
            .arg("-o")
            .arg(dir.join("out"))
            .arg("--source")
            .arg(source)
            .arg("-q"),
    );
    assert!(out.status.success());
    let name = spec_text
        .lines()
        .find_map(|l| l.strip_prefix("name = \""))
        .unwrap()
        .trim_end_matches('"');
    let r: Value =
        serde_json::from_slice(&fs::read(dir.join("out").join(format!("{name}.json"))).unwrap())
            .unwrap();
    kiln_testkit::schema::assert_valid("build", &r);
    r
}

fn disk_of(dir: &Path, r: &Value) -> PathBuf {
    dir.join("out").join(r["disk"]["file"].as_str().unwrap())
}

/// Copies a partition out of the disk into its own file.
fn extract(disk: &Path, p: &Value, to: &Path) -> PathBuf {
    let off = p["offset"].as_u64().unwrap();
    let size = p["size"].as_u64().unwrap();
    let data = fs::read(disk).unwrap();
    fs::write(to, &data[off as usize..(off + size) as usize]).unwrap();
    to.to_path_buf()
}

fn corpus(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    kiln_testkit::generate_corpus(
        &src,
        CorpusOptions {
            huge_dir: false,
            huge_sparse: false,
        },
    );
    // A /var with content, an ESP directory, a machine id.
    fs::create_dir_all(src.join("var/lib/app")).unwrap();
    fs::write(src.join("var/lib/app/state"), b"state\n").unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(
        src.join("etc/machine-id"),
        b"00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    fs::write(
        src.join("etc/os-release"),
        b"NAME=Test\nID=test\nVERSION_ID=1\n",
    )
    .unwrap();
    src
}

const FULL: &str = r#"
[image]
name = "full"
version = "3.1"
seed = "0123456789abcdef0123456789abcdef"
source_date_epoch = 1700000000

[[partition]]
type = "esp"
size = "40M"
copy = "espdir"

[[partition]]
type = "root"
fs = "ext4"
verity = true
slots = 2

[[partition]]
type = "usr"
fs = "erofs"
verity = true
compression = "lz4hc"

[[partition]]
type = "var"
size = "16M"

[[partition]]
type = "linux-generic"
label = "piece"
fs = "vfat"
size = "8M"
slot = { name = "piece", path = "/piece.html", capacity = "1M" }
"#;

#[test]
fn full_disk_passes_every_checker() {
    for t in [
        "sgdisk",
        "e2fsck",
        "fsck.erofs",
        "fsck.fat",
        "veritysetup",
        "mdir",
    ] {
        require_tool(t);
    }
    let d = tempfile::tempdir().unwrap();
    let src = corpus(d.path());
    fs::create_dir_all(d.path().join("espdir/EFI/tools")).unwrap();
    fs::write(
        d.path().join("espdir/EFI/tools/readme.txt"),
        b"on the ESP\n",
    )
    .unwrap();
    let r = build(d.path(), FULL, &src);
    let disk = disk_of(d.path(), &r);

    let v = run_ok(Command::new("sgdisk").arg("-v").arg(&disk));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No problems found"),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );

    let parts = r["partitions"].as_array().unwrap();
    let labels: Vec<&str> = parts.iter().map(|p| p["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "esp",
            "full_3.1",
            "full_3.1",
            "_empty",
            "_empty",
            "usr-x86-64",
            "usr-x86-64-verity",
            "var",
            "piece"
        ]
    );

    // Filesystem checkers on every filesystem.
    for (i, p) in parts.iter().enumerate() {
        let f = extract(&disk, p, &d.path().join(format!("p{i}")));
        match p["filesystem"].as_str() {
            Some("ext4") => {
                let o = run(Command::new("e2fsck").arg("-fn").arg(&f));
                assert!(
                    o.status.success(),
                    "e2fsck on partition {i}: {}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
            Some("erofs") => {
                let o = run(Command::new("fsck.erofs").arg(&f));
                assert!(
                    o.status.success(),
                    "fsck.erofs on partition {i}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            Some("vfat") => {
                let o = run(Command::new("fsck.fat").arg("-n").arg(&f));
                assert!(
                    o.status.success(),
                    "fsck.fat on partition {i}: {}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
            _ => {}
        }
    }
    // The ESP got the spec's directory.
    let esp = extract(&disk, &parts[0], &d.path().join("esp.img"));
    let o = run_ok(
        Command::new("mtype")
            .arg("-i")
            .arg(&esp)
            .arg("::/EFI/tools/readme.txt"),
    );
    assert_eq!(o.stdout, b"on the ESP\n");
    // /var went to the var partition, and the root keeps /var as an empty mount point.
    let var = extract(&disk, &parts[7], &d.path().join("var.img"));
    let o = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg("cat /lib/app/state")
            .arg(&var),
    );
    assert_eq!(o.stdout, b"state\n");

    // Verity: veritysetup verifies ours, and its own format with our salt and UUID gives the
    // same bytes and root hash.
    for vr in r["verity"].as_array().unwrap() {
        let dp = &parts[vr["data_partition"].as_u64().unwrap() as usize - 1];
        let hp = &parts[vr["hash_partition"].as_u64().unwrap() as usize - 1];
        let data = extract(&disk, dp, &d.path().join("vdata"));
        let hash = extract(&disk, hp, &d.path().join("vhash"));
        let rh = vr["root_hash"].as_str().unwrap();
        run_ok(
            Command::new("veritysetup")
                .arg("verify")
                .arg(&data)
                .arg(&hash)
                .arg(rh),
        );
        let theirs = d.path().join("theirs");
        let _ = fs::remove_file(&theirs);
        let o = run_ok(
            Command::new("veritysetup")
                .arg("format")
                .arg(format!("--salt={}", vr["salt"].as_str().unwrap()))
                .arg(format!("--uuid={}", vr["uuid"].as_str().unwrap()))
                .arg(&data)
                .arg(&theirs),
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(rh),
            "root hash differs: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let theirs = fs::read(&theirs).unwrap();
        let ours = fs::read(&hash).unwrap();
        assert_eq!(
            &ours[..theirs.len()],
            &theirs[..],
            "hash tree bytes differ from veritysetup format"
        );
        assert!(ours[theirs.len()..].iter().all(|&b| b == 0));
        // Partition UUIDs are the root hash halves.
        let h = rh.as_bytes();
        let compact = |u: &str| u.replace('-', "");
        assert_eq!(
            compact(dp["uuid"].as_str().unwrap()),
            std::str::from_utf8(&h[..32]).unwrap()
        );
        assert_eq!(
            compact(hp["uuid"].as_str().unwrap()),
            std::str::from_utf8(&h[32..]).unwrap()
        );
    }
    assert_eq!(r["root_hash"], r["verity"][0]["root_hash"]);

    // Split artifacts are the partitions' bytes.
    let out = d.path().join("out");
    let root = fs::read(out.join("full_3.1.root.raw")).unwrap();
    assert_eq!(
        root,
        fs::read(extract(&disk, &parts[1], &d.path().join("r"))).unwrap()
    );
    let rv = fs::read(out.join("full_3.1.root-verity.raw")).unwrap();
    assert_eq!(
        rv,
        fs::read(extract(&disk, &parts[2], &d.path().join("rv"))).unwrap()
    );
    for t in ["50-root.transfer", "60-root-verity.transfer"] {
        assert!(out.join("sysupdate.d").join(t).is_file(), "{t}");
    }
    // This spec has no [boot], so there is no UKI to transfer.
    assert!(!out.join("sysupdate.d/70-uki.transfer").exists());
    // The slot made it into the table, and kiln inspect shows it.
    let ins = run_ok(kiln().arg("inspect").arg("--json").arg(&disk));
    let ins = kiln_testkit::schema::assert_valid_output("inspect", &ins.stdout);
    assert_eq!(ins["slots"][0]["name"], "piece");
    assert_eq!(ins["partitions"][2]["content"]["kind"], "verity");
    assert_eq!(ins["partitions"][1]["content"]["kind"], "ext4");
    assert_eq!(ins["partitions"][5]["content"]["kind"], "erofs");
    // --dump renders every filesystem in full: the ext4 and the EROFS partition, each with
    // its superblock and the slot file by path.
    let dump =
        String::from_utf8(run_ok(kiln().arg("inspect").arg("--dump").arg(&disk)).stdout).unwrap();
    for want in [
        "== partition 2 (",
        "): ext4\nsuperblock @1024",
        "== partition 6 (",
        "): erofs\nsuper block @1024",
    ] {
        assert!(dump.contains(want), "{want:?} missing from:\n{dump}");
    }
    assert!(!dump.contains("unreadable"), "{dump}");
}

#[test]
fn reproducible_and_source_independent() {
    let d = tempfile::tempdir().unwrap();
    let src = corpus(d.path());
    fs::create_dir_all(d.path().join("espdir")).unwrap();
    let a = build(d.path(), FULL, &src);
    let first: Vec<(String, Vec<u8>)> = fs::read_dir(d.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect();
    fs::remove_dir_all(d.path().join("out")).unwrap();
    // Again from a sorted tar of the same directory (holes kept), under another umask.
    let tar = d.path().join("src.tar");
    run_ok(
        Command::new("tar")
            .arg("--sort=name")
            .arg("--sparse")
            .arg("--xattrs")
            .arg("--xattrs-include=*")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&src)
            .arg("."),
    );
    let b = build(d.path(), FULL, &tar);
    assert_eq!(
        a["input_digest"], b["input_digest"],
        "the same tree has the same digest whatever the source format"
    );
    for (name, bytes) in &first {
        if name == "full.json" || name.ends_with(".provenance.json") {
            continue; // they name the source path, which differs
        }
        let again = fs::read(d.path().join("out").join(name)).unwrap();
        assert!(
            again == *bytes,
            "{name} differs between a directory and a tar source"
        );
    }
    assert_eq!(a["disk"]["digest"], b["disk"]["digest"]);
}

#[test]
fn uuids_and_labels_match_systemd_repart() {
    let Some(repart) = tool("systemd-repart") else {
        panic!("systemd-repart not found; .ci/run installs systemd")
    };
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("var")).unwrap();
    fs::write(src.join("hello"), b"hi").unwrap();
    let spec = r#"
[image]
name = "rp"
version = "1"
seed = "0123456789abcdef0123456789abcdef"

[[partition]]
type = "esp"
size = "64M"

[[partition]]
type = "root"
size = "64M"
slots = 2

[[partition]]
type = "var"
size = "64M"

[[partition]]
type = "home"
size = "64M"

[[partition]]
type = "swap"
size = "64M"
"#;
    let r = build(d.path(), spec, &src);
    // An equivalent definitions directory: same types in the same order, our labels.
    let defs = d.path().join("defs");
    fs::create_dir_all(&defs).unwrap();
    for (i, p) in r["partitions"].as_array().unwrap().iter().enumerate() {
        let ty = p["type"].as_str().unwrap();
        fs::write(
            defs.join(format!("{:02}.conf", i * 10)),
            format!(
                "[Partition]\nType={ty}\nLabel={}\nSizeMinBytes=64M\nSizeMaxBytes=64M\n",
                p["label"].as_str().unwrap()
            ),
        )
        .unwrap();
    }
    let theirs = d.path().join("repart.raw");
    run_ok(
        Command::new(repart)
            .arg("--empty=create")
            .arg("--size=auto")
            .arg("--dry-run=no")
            .arg("--seed=0123456789abcdef0123456789abcdef")
            .arg(format!("--definitions={}", defs.display()))
            .arg(&theirs),
    );
    let sf = run_ok(Command::new("sfdisk").arg("--json").arg(&theirs));
    let sf: Value = serde_json::from_slice(&sf.stdout).unwrap();
    let table = &sf["partitiontable"];
    assert_eq!(
        table["id"].as_str().unwrap().to_lowercase(),
        r["disk_uuid"].as_str().unwrap()
    );
    let theirs_parts = table["partitions"].as_array().unwrap();
    let ours = r["partitions"].as_array().unwrap();
    assert_eq!(theirs_parts.len(), ours.len());
    for (t, o) in theirs_parts.iter().zip(ours) {
        assert_eq!(
            t["uuid"].as_str().unwrap().to_lowercase(),
            o["uuid"].as_str().unwrap(),
            "partition {}",
            o["label"]
        );
        assert_eq!(
            t["type"].as_str().unwrap().to_lowercase(),
            o["type_uuid"].as_str().unwrap()
        );
        assert_eq!(t["name"].as_str().unwrap(), o["label"].as_str().unwrap());
    }
}

#[test]
fn systemd_dissect_recognises_root_and_verity() {
    if !kiln_testkit::is_root() {
        eprintln!("SKIPPED: systemd-dissect needs loop devices (root)");
        return;
    }
    let dissect = require_tool("systemd-dissect");
    let d = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let r = {
        let out = d.path().join("out");
        run_ok(
            kiln()
                .arg("build")
                .arg(Path::new(root).join("../../examples/hello"))
                .arg("-o")
                .arg(&out)
                .arg("-q"),
        );
        let v: Value = serde_json::from_slice(&fs::read(out.join("hello.json")).unwrap()).unwrap();
        v
    };
    let disk = d
        .path()
        .join("out")
        .join(r["disk"]["file"].as_str().unwrap());
    let o = run_ok(
        Command::new(dissect)
            .arg(format!("--root-hash={}", r["root_hash"].as_str().unwrap()))
            .arg(&disk),
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let root_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("ro root "))
        .unwrap_or_else(|| panic!("no root in:\n{text}"));
    assert!(
        root_line.contains("erofs") && root_line.contains(" yes "),
        "root not verity-recognised:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("root-verity") && l.contains("DM_verity_hash")),
        "{text}"
    );
    assert!(text.contains("IMAGE_VERSION=1.0"), "{text}");
}

#[test]
fn spec_errors_name_line_and_column_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), vec![1u8; 3 << 20]).unwrap();
    let cases = [
        ("[image]\nname = \"e\"\nversion = \"1\"\ncolour = \"red\"\n[[partition]]\ntype = \"root\"\n", "kiln.toml:4:1"),
        ("[image]\nname = \"e\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\nsize = \"ten\"\n", "kiln.toml:6:8"),
        // Partitions that do not fit: 1M of root for 3M of data.
        ("[image]\nname = \"e\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\nsize = \"1M\"\n", "line 4"),
    ];
    for (spec, want) in cases {
        fs::write(d.path().join("kiln.toml"), spec).unwrap();
        let o = run(kiln()
            .arg("build")
            .arg(d.path())
            .arg("-o")
            .arg(d.path().join("out"))
            .arg("--source")
            .arg(&src)
            .arg("-q"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{spec}");
        assert!(err.contains(want), "{spec:?}: expected {want:?} in {err}");
        let left = fs::read_dir(d.path().join("out"))
            .map(|r| r.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "{spec:?} left files behind");
    }
}

#[test]
fn budget_overrun_lists_heaviest_paths_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("usr/share/big")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(
        src.join("usr/share/big/blob"),
        kiln_testkit::pseudo_random(1, 6 << 20),
    )
    .unwrap();
    fs::write(src.join("etc/small"), b"x").unwrap();
    fs::write(
        d.path().join("kiln.toml"),
        "[image]\nname = \"b\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\nfs = \"erofs\"\nbudget = \"2M\"\n",
    )
    .unwrap();
    let o = run(kiln()
        .arg("build")
        .arg(d.path())
        .arg("-o")
        .arg(d.path().join("out"))
        .arg("--source")
        .arg(&src)
        .arg("-q"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("budget") && err.contains("line 4"), "{err}");
    let first = err
        .lines()
        .position(|l| l.contains("/usr/share/big/blob"))
        .expect("heaviest path listed");
    assert!(
        err.lines()
            .position(|l| l.trim_end().ends_with("/usr"))
            .unwrap()
            < first,
        "directories aggregated, heaviest first:\n{err}"
    );
    assert!(err.contains("MiB"), "human-readable sizes: {err}");
    assert_eq!(
        fs::read_dir(d.path().join("out"))
            .map(|r| r.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn auto_sized_ext4_stays_minimized_when_alignment_leaves_no_room() {
    // Data just under a 1 MiB boundary: at fixed-size inode density (one inode per 16 KiB) the
    // aligned partition would need ~1 MiB more of inode tables than the minimized filesystem.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..63 {
        fs::write(
            src.join(format!("f{i:02}")),
            kiln_testkit::pseudo_random(i, (1 << 20) - 4096),
        )
        .unwrap();
    }
    let r = build(
        d.path(),
        "[image]\nname = \"m\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\nfs = \"ext4\"\n",
        &src,
    );
    let disk = disk_of(d.path(), &r);
    let p = &r["partitions"][0];
    assert!(p["fs_size"].as_u64().unwrap() <= p["size"].as_u64().unwrap());
    let f = extract(&disk, p, &d.path().join("root.img"));
    let o = run(Command::new("e2fsck").arg("-fn").arg(&f));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// A writable partition sized `auto` with `extra` space gets free inodes for it too (one per
/// 16 KiB, mke2fs's density): a /var with free blocks but no free inode cannot create a file,
/// which stopped systemd-logind and journald on a Debian image.
#[test]
fn auto_sized_ext4_extra_space_comes_with_free_inodes() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("var/lib")).unwrap();
    for i in 0..10 {
        fs::write(src.join(format!("var/lib/f{i}")), b"state\n").unwrap();
    }
    let r = build(
        d.path(),
        "[image]\nname = \"v\"\nversion = \"1\"\n[[partition]]\ntype = \"var\"\nextra = \"16M\"\n",
        &src,
    );
    let disk = disk_of(d.path(), &r);
    let f = extract(&disk, &r["partitions"][0], &d.path().join("var.img"));
    let o = run_ok(Command::new(require_tool("dumpe2fs")).arg("-h").arg(&f));
    let text = String::from_utf8_lossy(&o.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let free_inodes = field("Free inodes:");
    assert!(
        free_inodes >= (16 << 20) / 16384,
        "{free_inodes} free inodes:\n{text}"
    );
    assert!(field("Free blocks:") * 4096 >= 16 << 20, "{text}");
}
