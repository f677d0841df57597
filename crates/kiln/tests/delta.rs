//! `kiln update --from URL` on the example appliance (examples/appliance): v1 and v2 (v1's
//! tree plus one 256 KiB file) built with `--sign`; v2's index checked against the minisign CLI
//! and veritysetup; a v1 disk turned into v2 through a local HTTP server that serves Range
//! requests, once with every served root range tampered with (refused, the slot left
//! unbootable, v1 kept), once with connections dropped halfway (resumed; the slot equals v2's
//! split artifacts byte for byte), once with an index signed by another key (refused); the
//! updated disk boots v2.
//!
//! The server is the test's own (`ab_support::serve`), so that it can tamper and drop
//! connections on purpose.

#![allow(clippy::unwrap_used)]

mod ab_support;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ab_support::{esp_file, esp_ukis, gpt_names, partition, partition_bytes, serve, Faults};
use kiln_build::delta::Index;
use kiln_build::qemu::{self, BootOptions, Firmware};
use kiln_testkit::{require_tool, run, run_ok};
use serde_json::Value;
use sha2::Digest;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/appliance")
}

fn build(src: &Path, version: &str, out: &Path, key: &Path) -> Value {
    run_ok(
        kiln()
            .arg("build")
            .arg(example())
            .arg("--source")
            .arg(src)
            .args(["--image-version", version, "-o"])
            .arg(out)
            .arg("--sign")
            .arg(key)
            .arg("-q"),
    );
    serde_json::from_slice(&fs::read(out.join("appliance.json")).unwrap()).unwrap()
}

fn sha(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(fs::read(p).unwrap()))
}

fn update_from(disk: &Path, url: &str, pubkey: &Path, extra: &[&str]) -> std::process::Output {
    let t = Instant::now();
    let o = run(kiln()
        .arg("update")
        .arg(disk)
        .arg("--from")
        .arg(url)
        .arg("--pub")
        .arg(pubkey)
        .args(extra));
    eprintln!(
        "kiln update --from {url} {extra:?}: {:.1} s, {}\n{}",
        t.elapsed().as_secs_f64(),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Every top-level key of an update report, renamed, breaks its schema.
fn assert_renames_caught(doc: &Value) {
    for k in doc.as_object().unwrap().keys() {
        let mut copy = doc.clone();
        let m = copy.as_object_mut().unwrap();
        let v = m.remove(k).unwrap();
        m.insert(format!("{k}_renamed"), v);
        assert!(
            !kiln_testkit::schema::errors("update", &copy).is_empty(),
            "renaming {k} still validates"
        );
    }
}

#[test]
fn update_from_http_fetches_only_what_changed() {
    for t in [
        "busybox",
        "minisign",
        "veritysetup",
        "fsck.fat",
        "qemu-system-x86_64",
    ] {
        require_tool(t);
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let key = dir.join("release.key");
    let pubkey = dir.join("release.pub");
    kiln_ship::sign::generate_unencrypted(&key, &pubkey).unwrap();

    // v1, and v2 = v1 plus one file.
    let r1 = dir.join("root1");
    run_ok(Command::new(example().join("make-rootfs")).arg(&r1));
    let r2 = dir.join("root2");
    run_ok(Command::new("cp").arg("-a").arg(&r1).arg(&r2));
    fs::create_dir_all(r2.join("usr/share/delta")).unwrap();
    fs::write(
        r2.join("usr/share/delta/added.bin"),
        kiln_testkit::pseudo_random(22, 256 << 10),
    )
    .unwrap();
    build(&r1, "1", &dir.join("v1"), &key);
    let v2 = build(&r2, "2", &dir.join("v2"), &key);
    let out2 = dir.join("v2");

    // The index: signed (the minisign CLI agrees), its digests are dm-verity's level 0 of the
    // root image (recomputed here from the bytes), and the pair passes veritysetup.
    let index = out2.join("appliance_2.index");
    run_ok(
        Command::new("minisign")
            .arg("-Vm")
            .arg(&index)
            .arg("-p")
            .arg(&pubkey),
    );
    let idx = Index::parse(&fs::read(&index).unwrap(), "index").unwrap();
    let root = fs::read(out2.join("appliance_2.root.raw")).unwrap();
    let salt = hex::decode(&idx.meta.salt).unwrap();
    let mine: Vec<[u8; 32]> = root
        .chunks(4096)
        .map(|b| {
            let mut h = sha2::Sha256::new();
            h.update(&salt);
            h.update(b);
            h.finalize().into()
        })
        .collect();
    assert_eq!(idx.data, mine, "index digests are not sha256(salt ‖ block)");
    assert_eq!(idx.meta.root_hash, v2["root_hash"].as_str().unwrap());
    run_ok(
        Command::new("veritysetup")
            .arg("verify")
            .arg(out2.join("appliance_2.root.raw"))
            .arg(out2.join("appliance_2.root-verity.raw"))
            .arg(&idx.meta.root_hash),
    );
    let index_size = fs::metadata(&index).unwrap().len();
    eprintln!(
        "index: {index_size} bytes for a {} byte root ({:.2} %)",
        root.len(),
        100.0 * index_size as f64 / root.len() as f64
    );

    let faults = Arc::new(Mutex::new(Faults::default()));
    let base = serve(out2.clone(), faults.clone());
    let url = format!("{base}/appliance_2.index");
    let disk = dir.join("disk.img");
    fs::copy(dir.join("v1/appliance_1.img"), &disk).unwrap();
    let before = sha(&disk);

    // An index signed by another key is refused, before anything is written.
    let other = dir.join("other.key");
    kiln_ship::sign::generate_unencrypted(&other, &dir.join("other.pub")).unwrap();
    let o = update_from(&disk, &url, &dir.join("other.pub"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("signature"), "{err}");
    assert_eq!(sha(&disk), before);

    // --dry-run: what would be fetched; nothing written.
    let o = update_from(&disk, &url, &pubkey, &["--dry-run", "--json"]);
    assert!(o.status.success());
    let plan = kiln_testkit::schema::assert_valid_output("update", &o.stdout);
    eprintln!("dry run: {plan}");
    assert_renames_caught(&plan);
    let missing = plan["root_missing_size"].as_u64().unwrap();
    let pct = plan["root_missing_percent"].as_f64().unwrap();
    assert!(missing > 0 && missing < root.len() as u64 / 2, "{plan}");
    assert_eq!(sha(&disk), before);

    // Every root range tampered with: each bad block is fetched again, then refused; the slot
    // is left named _empty with no UKI of v2, so v1 stays the only thing to boot.
    faults.lock().unwrap().tamper = Some(".root.raw".into());
    let o = update_from(&disk, &url, &pubkey, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("does not match the signed index"),
        "{err}"
    );
    assert_eq!(esp_ukis(&disk), ["appliance_1+3.efi"]);
    assert!(gpt_names(&disk).iter().filter(|n| *n == "_empty").count() == 2);
    faults.lock().unwrap().tamper = None;

    // Connections dropped after 10000 bytes, six times: resumed, and the result is v2's bytes.
    faults.lock().unwrap().drop = Some((".root.raw".into(), 10_000, 6));
    let o = update_from(&disk, &url, &pubkey, &["--json"]);
    assert!(o.status.success());
    let rep = kiln_testkit::schema::assert_valid_output("update", &o.stdout);
    eprintln!("update: {rep}");
    assert!(rep["retries"].as_u64().unwrap() >= 6, "{rep}");
    assert_eq!(faults.lock().unwrap().drop.as_ref().unwrap().2, 0);
    // A fetched byte is never more than what the plan said plus the retries' waste.
    assert!(
        rep["fetched_size"].as_u64().unwrap()
            < missing + rep["uki_missing_size"].as_u64().unwrap() + 7 * (8 << 20)
    );
    let (dn, hn) = (
        rep["data_partition"].as_u64().unwrap() as usize,
        rep["hash_partition"].as_u64().unwrap() as usize,
    );
    let slot = partition_bytes(&disk, dn, Some(root.len() as u64));
    assert!(
        slot == root,
        "the updated slot differs from v2's root image"
    );
    let verity = fs::read(out2.join("appliance_2.root-verity.raw")).unwrap();
    assert!(partition_bytes(&disk, hn, Some(verity.len() as u64)) == verity);
    assert_eq!(esp_ukis(&disk), ["appliance_1+3.efi", "appliance_2+3.efi"]);
    let uki_on_esp = esp_file(&disk, "/EFI/Linux/appliance_2+3.efi");
    assert!(uki_on_esp == fs::read(out2.join("appliance_2.efi")).unwrap());
    let names = gpt_names(&disk);
    assert_eq!(names[dn - 1], "appliance_2");
    eprintln!(
        "delta: root {} of {} bytes fetched ({pct:.2} %), UKI {} of {} bytes, index {index_size} bytes",
        missing,
        root.len(),
        rep["uki_missing_size"],
        rep["uki_size"]
    );

    // The ESP passes fsck.fat, and the disk boots v2 under OVMF.
    let f = fs::File::open(&disk).unwrap();
    let esp = partition(&disk, "esp");
    let mut eb = vec![0u8; esp.size() as usize];
    f.read_exact_at(&mut eb, esp.offset()).unwrap();
    let espf = dir.join("esp.img");
    fs::write(&espf, &eb).unwrap();
    run_ok(Command::new("fsck.fat").arg("-n").arg(&espf));
    let out = qemu::boot(&BootOptions {
        image: Some(disk.clone()),
        firmware: Firmware::Ovmf(None),
        expect: Some("APPLIANCE-DONE".into()),
        timeout: Duration::from_secs(180),
        keep: true,
        ..BootOptions::default()
    })
    .unwrap();
    eprintln!("boot of the updated disk: {}", out.summary());
    assert!(
        out.success()
            && out
                .console
                .contains("APPLIANCE-BOOT image=appliance version=2"),
        "{}\n{}",
        out.summary(),
        out.console
    );
}
