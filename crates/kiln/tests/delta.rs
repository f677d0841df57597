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

use ab_support::{
    esp_file, esp_ukis, gpt_names, partition, partition_bytes, partition_named_bytes, serve, Faults,
};
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

/// A signing key pair in `dir` and two signed builds of the example appliance, `dir/v1` and
/// `dir/v2`: v2 is v1 plus one 256 KiB file of pseudo-random bytes from `seed`. Returns the
/// public key and v2's build report.
fn v1_and_v2(dir: &Path, seed: u64) -> (PathBuf, Value) {
    let key = dir.join("release.key");
    let pubkey = dir.join("release.pub");
    kiln_ship::sign::generate_unencrypted(&key, &pubkey).unwrap();
    let r1 = dir.join("root1");
    run_ok(Command::new(example().join("make-rootfs")).arg(&r1));
    let r2 = dir.join("root2");
    run_ok(Command::new("cp").arg("-a").arg(&r1).arg(&r2));
    fs::create_dir_all(r2.join("usr/share/delta")).unwrap();
    fs::write(
        r2.join("usr/share/delta/added.bin"),
        kiln_testkit::pseudo_random(seed, 256 << 10),
    )
    .unwrap();
    build(&r1, "1", &dir.join("v1"), &key);
    let v2 = build(&r2, "2", &dir.join("v2"), &key);
    (pubkey, v2)
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
    let (pubkey, v2) = v1_and_v2(dir, 22);
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

/// `strace` arguments that kill the traced process at the `n`th `pwrite64` call of any of its
/// threads (strace counts per thread), before that write happens.
fn cut_at(n: usize) -> Vec<String> {
    [
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=pwrite64",
        "-e",
        &format!("inject=pwrite64:signal=KILL:when={n}"),
    ]
    .map(String::from)
    .to_vec()
}

/// `pwrite64` calls of each thread of a full `kiln update` run, main thread first.
fn writes_per_thread(dir: &Path, update: &[std::ffi::OsString]) -> Vec<usize> {
    let log = dir.join("strace.log");
    run_ok(
        Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=pwrite64", "-o"])
            .arg(&log)
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(update),
    );
    let mut per: std::collections::BTreeMap<u32, usize> = Default::default();
    for l in fs::read_to_string(&log).unwrap().lines() {
        if let Some(tid) = l.split_whitespace().next().and_then(|t| t.parse().ok()) {
            *per.entry(tid).or_default() += 1;
        }
    }
    per.into_values().collect()
}

/// What boots from a disk: its GPT and its ESP (the slots' data only matters where the GPT
/// names a slot for a version, and then it is checked byte for byte before this counts).
fn boot_state(disk: &Path) -> [u8; 32] {
    let f = fs::File::open(disk).unwrap();
    let mut h = sha2::Sha256::new();
    let mut gpt = vec![0u8; 34 * 512];
    f.read_exact_at(&mut gpt, 0).unwrap();
    h.update(&gpt);
    h.update(partition_named_bytes(disk, "esp"));
    h.finalize().into()
}

/// What `fsck.fat -n` may report on an ESP that a cut update left: only what fat::edit's
/// write order allows by design, all of it lost space or stale summaries that the next edit
/// repairs (clusters chained before their entry landed, the second FAT copy not yet equal to
/// the first, FSInfo's free count, long-name parts of an entry never completed). Anything
/// else (a cross-linked or truncated chain, a bad entry) is a finding.
fn esp_after_cut(esp: &Path, what: &str) {
    let o = run(Command::new("fsck.fat").arg("-n").arg(esp));
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        return;
    }
    let allowed = [
        "fsck.fat ",
        "FATs differ but appear to be intact",
        "  Using first FAT",
        "Reclaimed ",
        "Free cluster summary wrong",
        "Orphaned long file name part",
        "Leaving filesystem unchanged",
        "  1) ",
        "  2) ",
        "  Not auto-correcting",
        "  Auto-correcting",
    ];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let summary = line.starts_with('/') && line.contains(" files, ");
        assert!(
            summary || allowed.iter().any(|a| line.starts_with(a)),
            "{what}: fsck.fat -n found more than a cut may leave: {line:?}\n{text}"
        );
    }
}

/// Must hold (#22): a power cut at any point of an update leaves a disk that boots, and the
/// next run finishes the update. `kiln update --with` is cut before each of its writes, and
/// `kiln update --from` (over HTTP) at 24 points of its main thread's writes (spread over the
/// block copies, and each of the last 12, which are the hash partition, the GPT and the ESP);
/// the writes before the cut are on the disk, the rest never happen. After each cut: fsck.fat
/// finds nothing on the ESP but lost space and stale summaries (see [`esp_after_cut`]); a
/// slot that the GPT names for version 2 holds exactly v2's data and hash tree, and v2's UKI
/// is on the ESP only then; the disk boots version 1 or, when v2's UKI is there, version 2
/// (booted once for each distinct GPT + ESP); rerunning the update succeeds and leaves v2's
/// exact slot; and the ESP it leaves passes fsck.fat clean. Not modelled: a disk that
/// reorders writes kiln did not sync.
#[test]
fn update_cut_at_every_write_boots() {
    for t in ["busybox", "strace", "fsck.fat", "qemu-system-x86_64"] {
        require_tool(t);
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (pubkey, _) = v1_and_v2(dir, 23);
    let out2 = dir.join("v2");
    let root = fs::read(out2.join("appliance_2.root.raw")).unwrap();
    let verity = fs::read(out2.join("appliance_2.root-verity.raw")).unwrap();
    let url = format!(
        "{}/appliance_2.index",
        serve(out2.clone(), Arc::new(Mutex::new(Faults::default())))
    );
    let v1 = dir.join("v1/appliance_1.img");
    let disk = dir.join("disk.img");
    let fresh = || {
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&v1)
                .arg(&disk),
        );
    };
    let with: Vec<std::ffi::OsString> = vec![
        "update".into(),
        disk.clone().into(),
        "--with".into(),
        out2.clone().into(),
    ];
    let from: Vec<std::ffi::OsString> = vec![
        "update".into(),
        disk.clone().into(),
        "--from".into(),
        url.into(),
        "--pub".into(),
        pubkey.clone().into(),
    ];
    // Where to cut: before every write of --with; for --from, the main thread's writes.
    fresh();
    let n_with = writes_per_thread(dir, &with)[0];
    fresh();
    let n_from = writes_per_thread(dir, &from)[0];
    eprintln!("writes: --with {n_with}, --from {n_from} (main thread)");
    assert!(n_with >= 5 && n_from >= 24, "{n_with} {n_from}");
    let mut cuts: Vec<(&str, usize)> = (1..=n_with).map(|n| ("with", n)).collect();
    let mut spread: Vec<usize> = (0..12).map(|i| 1 + i * (n_from - 12) / 12).collect();
    spread.extend(n_from - 11..=n_from);
    spread.dedup();
    cuts.extend(spread.into_iter().map(|n| ("from", n)));

    let mut booted: std::collections::HashMap<[u8; 32], String> = Default::default();
    let mut check = |what: &str| {
        // The ESP is consistent: clean after a full run, after a cut at most what the edit's
        // write order allows.
        let espf = dir.join("esp.img");
        fs::write(&espf, partition_named_bytes(&disk, "esp")).unwrap();
        if what.ends_with("full run") {
            run_ok(Command::new("fsck.fat").arg("-n").arg(&espf));
        } else {
            esp_after_cut(&espf, what);
        }
        // A slot named for v2 holds v2 exactly; v2's UKI is there only with such a slot.
        let names = gpt_names(&disk);
        let v2_slot = names.iter().position(|n| n == "appliance_2");
        if let Some(i) = v2_slot {
            assert!(
                partition_bytes(&disk, i + 1, Some(root.len() as u64)) == root,
                "{what}: a slot named appliance_2 without v2's data"
            );
            assert!(
                partition_bytes(&disk, i + 2, Some(verity.len() as u64)) == verity,
                "{what}: v2's hash partition differs"
            );
        }
        let ukis = esp_ukis(&disk);
        let v2_uki = ukis.iter().any(|u| u.starts_with("appliance_2"));
        assert!(
            !v2_uki || v2_slot.is_some(),
            "{what}: v2's UKI without its slot: {names:?}"
        );
        assert!(
            ukis.iter().any(|u| u.starts_with("appliance_1")),
            "{what}: v1's UKI is gone: {ukis:?}"
        );
        // Boots, once per distinct GPT + ESP.
        let want = if v2_uki { 2 } else { 1 };
        let state = boot_state(&disk);
        if let Some(first) = booted.get(&state) {
            eprintln!("{what}: boots as {first} did");
            return;
        }
        let snap = dir.join("boot.img");
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&disk)
                .arg(&snap),
        );
        let out = qemu::boot(&BootOptions {
            image: Some(snap.clone()),
            firmware: Firmware::Ovmf(None),
            expect: Some("APPLIANCE-DONE".into()),
            timeout: Duration::from_secs(180),
            ..BootOptions::default()
        })
        .unwrap();
        eprintln!("boot after {what}: {}", out.summary());
        assert!(
            out.success()
                && out
                    .console
                    .contains(&format!("APPLIANCE-BOOT image=appliance version={want}")),
            "boot after {what}: {}\n{}",
            out.summary(),
            out.console
        );
        booted.insert(state, what.to_string());
    };

    for (mode, n) in &cuts {
        fresh();
        let args = if *mode == "with" { &with } else { &from };
        let o = run(Command::new("strace")
            .args(cut_at(*n))
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(args));
        // strace ends as its tracee did: killed.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            o.status.signal(),
            Some(9),
            "--{mode} cut before write {n}: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        let what = format!("--{mode} cut before write {n}");
        check(&what);
        // The next run finishes the update.
        run_ok(kiln().args(args));
        let names = gpt_names(&disk);
        let i = names.iter().position(|n| n == "appliance_2").unwrap();
        assert!(
            partition_bytes(&disk, i + 1, Some(root.len() as u64)) == root,
            "{what}, then a full run: the slot differs from v2"
        );
        assert_eq!(
            esp_ukis(&disk),
            ["appliance_1+3.efi", "appliance_2+3.efi"],
            "{what}, then a full run"
        );
        check(&format!("{what}, then a full run"));
    }
    eprintln!(
        "{} cuts, {} distinct GPT + ESP states booted",
        cuts.len(),
        booted.len()
    );
}
