//! systemd-repart's verity output as a second oracle: repart (with mkfs.ext4 and its own
//! veritysetup library code) writes a root + verity pair; kiln's GPT reader finds it, kiln's
//! verity writer re-creates the hash partition byte for byte from repart's salt, UUID and block
//! sizes, and the root hash halves are the two partition UUIDs (SPECS.md). systemd 252 picks a
//! random salt and superblock UUID, so they are read back rather than derived.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::process::Command;

use kiln_formats::gpt::{self, Gpt};
use kiln_formats::sink::MemSink;
use kiln_formats::verity;
use kiln_testkit::{is_root, require_tool, run_ok};

#[test]
fn repart_verity_pair_matches_kiln() {
    // systemd-repart 252 formats through a loop device, which needs root (CI runs as root).
    if !is_root() {
        eprintln!("SKIPPED repart_verity_pair_matches_kiln: systemd-repart Format= needs root");
        return;
    }
    require_tool("mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("repart.d");
    fs::create_dir(&defs).unwrap();
    let payload = dir.path().join("payload.txt");
    fs::write(&payload, "verity payload\n").unwrap();
    fs::write(
        defs.join("20-root.conf"),
        format!(
            "[Partition]\nType=root-x86-64\nFormat=ext4\nVerity=data\nVerityMatchKey=root\n\
             SizeMinBytes=24M\nSizeMaxBytes=24M\nCopyFiles={}:/payload.txt\n",
            payload.display()
        ),
    )
    .unwrap();
    fs::write(
        defs.join("21-root-verity.conf"),
        "[Partition]\nType=root-x86-64-verity\nVerity=hash\nVerityMatchKey=root\n\
         SizeMinBytes=4M\nSizeMaxBytes=4M\n",
    )
    .unwrap();
    let img = dir.path().join("disk.raw");
    run_ok(
        Command::new(require_tool("systemd-repart"))
            .arg("--empty=create")
            .arg("--size=auto")
            .arg("--dry-run=no")
            .arg("--seed=0123456789abcdef0123456789abcdef")
            .arg(format!("--definitions={}", defs.display()))
            .arg(&img),
    );

    let f = File::open(&img).unwrap();
    let g = Gpt::read(&f).unwrap();
    let data = g
        .partitions
        .iter()
        .find(|p| p.type_guid == gpt::TYPE_ROOT_X86_64)
        .unwrap();
    let hash = g
        .partitions
        .iter()
        .find(|p| p.type_guid == gpt::TYPE_ROOT_X86_64_VERITY)
        .unwrap();

    let mut sb = [0u8; verity::SUPERBLOCK_SIZE];
    f.read_exact_at(&mut sb, hash.offset()).unwrap();
    let (sbs, params) = verity::parse_superblock(&sb).unwrap();
    let data_size = sbs.data_blocks.get() * u64::from(params.data_block_size);
    assert_eq!(
        data_size,
        data.size(),
        "repart hashes the whole data partition"
    );

    let read_data = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, data.offset() + off);
    let hs = verity::hash_size(data_size, &params);
    let sink = MemSink::new(hs as usize);
    let ours = verity::format(&params, data_size, &read_data, &sink).unwrap();
    let ours_bytes = sink.into_inner();
    let mut theirs = vec![0u8; hs as usize];
    f.read_exact_at(&mut theirs, hash.offset()).unwrap();
    assert!(
        ours_bytes == theirs,
        "hash partition differs from kiln's tree"
    );

    // Root hash halves are the partition UUIDs, raw (no version bits).
    assert_eq!(&ours.root_hash[..16], data.part_guid.as_bytes());
    assert_eq!(&ours.root_hash[16..], hash.part_guid.as_bytes());

    let read_hash = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, hash.offset() + off);
    verity::verify(&read_data, &read_hash, hash.size(), &ours.root_hash).unwrap();
}
