//! systemd-repart as the oracle for seed-derived identifiers: for the same seed and partition
//! list, kiln's GPT writer fed by `repart`'s derivations must give the same disk GUID, partition
//! UUIDs (including a second partition of one type), type GUIDs and labels, and `sgdisk -v` must
//! be clean on kiln's disk.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::process::Command;

use kiln_formats::gpt::{self, Gpt, Partition};
use kiln_formats::repart;
use kiln_formats::sink::FileSink;
use kiln_testkit::{require_tool, run_ok};

const SEED: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn same_ids_and_labels_as_systemd_repart() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("repart.d");
    fs::create_dir(&defs).unwrap();
    // (file, type, MiB): two roots of the same type exercise k = 1 and the "-2" label.
    let plan: [(&str, &str, u64); 6] = [
        ("10-esp", "esp", 20),
        ("20-root", "root-x86-64", 30),
        ("21-root-verity", "root-x86-64-verity", 4),
        ("30-root-b", "root-x86-64", 30),
        ("40-var", "var", 10),
        ("50-data", "linux-generic", 5),
    ];
    for (file, ty, mib) in plan {
        fs::write(
            defs.join(format!("{file}.conf")),
            format!("[Partition]\nType={ty}\nSizeMinBytes={mib}M\nSizeMaxBytes={mib}M\n"),
        )
        .unwrap();
    }
    let theirs = dir.path().join("repart.raw");
    run_ok(
        Command::new(require_tool("systemd-repart"))
            .arg("--empty=create")
            .arg("--size=auto")
            .arg("--dry-run=no")
            .arg(format!("--seed={SEED}"))
            .arg(format!("--definitions={}", defs.display()))
            .arg(&theirs),
    );
    let rep = Gpt::read(&File::open(&theirs).unwrap()).unwrap();
    assert_eq!(rep.partitions.len(), plan.len());

    // Rebuild the same table with kiln: ids and labels from the seed, extents from repart's
    // disk (placement is the build's policy, not what this test checks).
    let seed = repart::uuid_from_spec(SEED).unwrap();
    let mut g = Gpt::new(rep.disk_size(), repart::disk_uuid(&seed)).unwrap();
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, ty, _), theirs) in plan.iter().zip(&rep.partitions) {
        let k = seen.entry(ty).or_insert(0);
        let type_guid = gpt::type_by_name(ty).unwrap().guid;
        g.partitions.push(Partition {
            type_guid,
            part_guid: repart::partition_uuid(&seed, &type_guid, *k),
            first_lba: theirs.first_lba,
            last_lba: theirs.last_lba,
            attributes: theirs.attributes,
            name: repart::label(ty, *k),
        });
        *k += 1;
    }
    assert_eq!(
        g.disk_guid.to_string(),
        rep.disk_guid.to_string(),
        "disk GUID"
    );
    for (ours, theirs) in g.partitions.iter().zip(&rep.partitions) {
        assert_eq!(
            ours.type_guid.to_string(),
            theirs.type_guid.to_string(),
            "type of {}",
            theirs.name
        );
        assert_eq!(
            ours.part_guid.to_string(),
            theirs.part_guid.to_string(),
            "UUID of {}",
            theirs.name
        );
        assert_eq!(ours.name, theirs.name, "label");
    }
    assert_eq!(g.partitions[3].name, "root-x86-64-2");

    let img = dir.path().join("kiln.raw");
    let f = File::create(&img).unwrap();
    f.set_len(g.disk_size()).unwrap();
    g.write(&FileSink::new(&f, 0, g.disk_size())).unwrap();
    drop(f);
    let out = run_ok(Command::new(require_tool("sgdisk")).arg("-v").arg(&img));
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");

    // repart (through libfdisk) starts the usable area at 1 MiB; given that, the primary header
    // and entry array are byte-identical to repart's.
    g.first_usable_lba = rep.first_usable_lba;
    let f = File::create(&img).unwrap();
    f.set_len(g.disk_size()).unwrap();
    g.write(&FileSink::new(&f, 0, g.disk_size())).unwrap();
    drop(f);
    let a = fs::read(&theirs).unwrap();
    let b = fs::read(&img).unwrap();
    assert_eq!(
        a[512..34 * 512],
        b[512..34 * 512],
        "primary GPT differs from repart's"
    );
}
