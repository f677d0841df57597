//! GPT writer and reader against sgdisk (gdisk): sgdisk verifies and lists what kiln writes, kiln
//! reads what sgdisk writes, and both agree byte for byte on headers and entry arrays.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::path::Path;
use std::process::Command;

use kiln_formats::gpt::{self, Gpt, Partition};
use kiln_formats::repart::{self, Uuid};
use kiln_formats::sink::FileSink;
use kiln_testkit::{require_tool, run_ok};

fn sgdisk(args: &[&str], img: &Path) -> String {
    let out = run_ok(Command::new(require_tool("sgdisk")).args(args).arg(img));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_disk(g: &Gpt, path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(g.disk_size()).unwrap();
    g.write(&FileSink::new(&f, 0, g.disk_size())).unwrap();
}

fn sample(size: u64) -> Gpt {
    let seed = Uuid::try_parse("0123456789abcdef0123456789abcdef").unwrap();
    let mut g = Gpt::new(size, repart::disk_uuid(&seed)).unwrap();
    let mut next = 2048u64;
    let parts: [(&str, u64, u64); 4] = [
        ("esp", 8 << 20, 0),
        ("root-x86-64", 12 << 20, gpt::ATTR_READ_ONLY),
        (
            "root-x86-64-verity",
            1 << 20,
            gpt::ATTR_READ_ONLY | gpt::ATTR_NO_AUTO,
        ),
        ("var", 4 << 20, gpt::ATTR_GROWFS),
    ];
    for (name, bytes, attrs) in parts {
        let ty = gpt::type_by_name(name).unwrap().guid;
        g.partitions.push(Partition {
            type_guid: ty,
            part_guid: repart::partition_uuid(&seed, &ty, 0),
            first_lba: next,
            last_lba: next + bytes / 512 - 1,
            attributes: attrs,
            name: name.into(),
        });
        next += bytes / 512;
    }
    g
}

#[test]
fn sgdisk_verifies_and_lists_what_kiln_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let g = sample(32 << 20);
    write_disk(&g, &img);

    let v = sgdisk(&["-v"], &img);
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");

    let p = sgdisk(&["-p"], &img);
    assert!(
        p.contains(&format!("Disk identifier (GUID): {:X}", g.disk_guid)),
        "{p}"
    );
    assert!(
        p.contains("First usable sector is 34, last usable sector is 65502"),
        "{p}"
    );
    for (i, part) in g.partitions.iter().enumerate() {
        let info = sgdisk(&["-i", &(i + 1).to_string()], &img);
        let want = [
            format!("Partition GUID code: {:X}", part.type_guid),
            format!("Partition unique GUID: {:X}", part.part_guid),
            format!("First sector: {} ", part.first_lba),
            format!("Last sector: {} ", part.last_lba),
            format!("Attribute flags: {:016X}", part.attributes),
            format!("Partition name: '{}'", part.name),
        ];
        for w in want {
            assert!(
                info.contains(&w),
                "partition {}: want {w:?} in\n{info}",
                i + 1
            );
        }
    }

    // Our reader sees what we wrote, from a real file through pread.
    let back = Gpt::read(&File::open(&img).unwrap()).unwrap();
    assert_eq!(back.partitions, g.partitions);
    assert_eq!(back.disk_guid, g.disk_guid);
}

#[test]
fn iso_sized_disk_not_mib_aligned_is_clean() {
    // A hybrid ISO's size is a multiple of 2048 but rarely of 1 MiB; partitions are in LBAs.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("iso.img");
    let size = (10 << 20) + 3 * 2048;
    let mut g = Gpt::new(size, Uuid::from_bytes([7; 16])).unwrap();
    g.partitions.push(Partition {
        type_guid: gpt::TYPE_LINUX_GENERIC,
        part_guid: Uuid::from_bytes([1; 16]),
        first_lba: 64,
        last_lba: 4095,
        attributes: 0,
        name: "ISO9660".into(),
    });
    g.partitions.push(Partition {
        type_guid: gpt::TYPE_ESP,
        part_guid: Uuid::from_bytes([2; 16]),
        first_lba: 4096,
        last_lba: g.last_usable_lba,
        attributes: 0,
        name: "Appended2".into(),
    });
    write_disk(&g, &img);
    let v = sgdisk(&["-v"], &img);
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");
}

#[test]
fn kiln_reads_sgdisk_tables_byte_identical_headers() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sg.img");
    let ours = dir.path().join("ours.img");
    let g = sample(32 << 20);
    File::create(&img).unwrap().set_len(g.disk_size()).unwrap();
    let mut args = vec!["-o".to_string(), "-U".into(), g.disk_guid.to_string()];
    for (i, p) in g.partitions.iter().enumerate() {
        let n = i + 1;
        args.push("-n".into());
        args.push(format!("{n}:{}:{}", p.first_lba, p.last_lba));
        args.push("-t".into());
        args.push(format!("{n}:{}", p.type_guid));
        args.push("-u".into());
        args.push(format!("{n}:{}", p.part_guid));
        args.push("-c".into());
        args.push(format!("{n}:{}", p.name));
        for bit in 0..64 {
            if p.attributes >> bit & 1 == 1 {
                args.push("-A".into());
                args.push(format!("{n}:set:{bit}"));
            }
        }
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    sgdisk(&argv, &img);

    let back = Gpt::read(&File::open(&img).unwrap()).unwrap();
    assert_eq!(back.disk_guid, g.disk_guid);
    assert_eq!(back.partitions, g.partitions);
    assert_eq!(back.entry_numbers, vec![1, 2, 3, 4]);

    // Headers and entry arrays (sectors 1..34 and the last 33) are byte-identical to sgdisk's.
    write_disk(&g, &ours);
    let a = std::fs::read(&img).unwrap();
    let b = std::fs::read(&ours).unwrap();
    assert_eq!(
        a[512..34 * 512],
        b[512..34 * 512],
        "primary header/entries differ"
    );
    let tail = a.len() - 33 * 512;
    assert_eq!(a[tail..], b[tail..], "backup entries/header differ");
    assert_eq!(
        a[446..512],
        b[446..512],
        "protective MBR partition table differs"
    );

    // With the primary header wiped, the reader falls back to sgdisk's backup and says why.
    let mut damaged = a.clone();
    damaged[512..1024].fill(0);
    let back = Gpt::from_bytes(&damaged).unwrap();
    assert_eq!(back.partitions, g.partitions);
    assert!(back
        .primary_error
        .as_deref()
        .unwrap()
        .contains("no GPT header at LBA 1"));
}

#[test]
fn corrupt_tables_give_errors_not_panics() {
    let g = sample(32 << 20);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    write_disk(&g, &img);
    let mut d = std::fs::read(&img).unwrap();
    let head = d[..34 * 512].to_vec();
    let noise = kiln_testkit::pseudo_random(3, 8 * 3000);
    for round in 0..3000 {
        d[..34 * 512].copy_from_slice(&head);
        let r = u64::from_le_bytes(noise[round * 8..round * 8 + 8].try_into().unwrap());
        // Corrupt the primary header or entries and re-seal the CRCs, so the damage reaches
        // the field checks instead of stopping at a CRC mismatch.
        let at = 512 + (r as usize % (33 * 512));
        d[at] ^= (r >> 56) as u8 | 1;
        let arr_crc = crc32fast::hash(&d[1024..1024 + 16384]);
        d[512 + 88..512 + 92].copy_from_slice(&arr_crc.to_le_bytes());
        d[512 + 16..512 + 20].fill(0);
        let hcrc = crc32fast::hash(&d[512..512 + 92]);
        d[512 + 16..512 + 20].copy_from_slice(&hcrc.to_le_bytes());
        match Gpt::from_bytes(&d) {
            Ok(back) => {
                let _ = back.dump();
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
}
