//! dm-verity against cryptsetup's veritysetup: for the same salt and UUID the hash device must
//! be byte-identical and the root hash equal; `veritysetup verify` must accept kiln's tree; a
//! flipped data byte must fail both kiln's and veritysetup's verification.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use kiln_formats::repart::{self, Uuid};
use kiln_formats::sink::FileSink;
use kiln_formats::verity::{self, Params, VerityError};
use kiln_testkit::{pseudo_random, require_tool, run, run_ok};

const UUID: &str = "5f3a61d2-8c47-4b0e-9d21-3e7a9c0b6f18";

fn veritysetup_format(data: &Path, hash: &Path, salt: &str) -> String {
    let out = run_ok(
        Command::new(require_tool("veritysetup"))
            .arg("format")
            .arg(format!("--salt={salt}"))
            .arg(format!("--uuid={UUID}"))
            .arg(data)
            .arg(hash),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no root hash in veritysetup output:\n{text}"))
}

fn kiln_format(params: &Params, data: &Path, hash: &Path) -> verity::Formatted {
    let d = File::open(data).unwrap();
    let size = d.metadata().unwrap().len();
    let h = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(hash)
        .unwrap();
    let hs = verity::hash_size(size, params);
    h.set_len(hs).unwrap();
    let read = |off: u64, buf: &mut [u8]| d.read_exact_at(buf, off);
    verity::format(params, size, &read, &FileSink::new(&h, 0, hs)).unwrap()
}

fn kiln_verify(data: &Path, hash: &Path, root: &[u8; 32]) -> Result<verity::Verified, VerityError> {
    let d = File::open(data).unwrap();
    let h = File::open(hash).unwrap();
    let hl = h.metadata().unwrap().len();
    let rd = |off: u64, buf: &mut [u8]| d.read_exact_at(buf, off);
    let rh = |off: u64, buf: &mut [u8]| h.read_exact_at(buf, off);
    verity::verify(&rd, &rh, hl, root)
}

#[test]
fn byte_identical_to_veritysetup_for_many_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let seed = Uuid::try_parse("0123456789abcdef0123456789abcdef").unwrap();
    let salt = repart::verity_salt(&seed);
    let params = Params::new(&salt, Uuid::try_parse(UUID).unwrap());
    for blocks in [1u64, 2, 127, 128, 129, 300, 16384, 16385] {
        let data = dir.path().join(format!("data-{blocks}"));
        let mut bytes = pseudo_random(blocks, (blocks * 4096) as usize);
        // Some all-zero blocks too: sinks skip writing zeroes, which must not change the tree.
        if blocks > 2 {
            bytes[4096..8192].fill(0);
        }
        fs::write(&data, &bytes).unwrap();
        let theirs = dir.path().join(format!("vs-{blocks}"));
        let ours = dir.path().join(format!("kiln-{blocks}"));
        let root = veritysetup_format(&data, &theirs, &verity::hex(&salt));
        let f = kiln_format(&params, &data, &ours);
        assert_eq!(f.root_hash_hex(), root, "root hash for {blocks} blocks");
        assert_eq!(f.data_blocks, blocks);
        let a = fs::read(&theirs).unwrap();
        let b = fs::read(&ours).unwrap();
        assert_eq!(a.len(), b.len(), "hash device size for {blocks} blocks");
        assert!(a == b, "hash device bytes differ for {blocks} blocks");

        let out = run(Command::new(require_tool("veritysetup"))
            .arg("verify")
            .arg(&data)
            .arg(&ours)
            .arg(&root));
        assert!(
            out.status.success(),
            "veritysetup verify rejected kiln's tree for {blocks} blocks: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        kiln_verify(&data, &ours, &f.root_hash).unwrap();
    }
}

#[test]
fn flipped_data_byte_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let params = Params::new(&[0x5A; 32], Uuid::try_parse(UUID).unwrap());
    let data = dir.path().join("data");
    let hash = dir.path().join("hash");
    fs::write(&data, pseudo_random(42, 300 * 4096)).unwrap();
    let f = kiln_format(&params, &data, &hash);
    kiln_verify(&data, &hash, &f.root_hash).unwrap();

    let file = File::options().write(true).open(&data).unwrap();
    let mut b = [0u8; 1];
    File::open(&data)
        .unwrap()
        .read_exact_at(&mut b, 200 * 4096 + 17)
        .unwrap();
    file.write_all_at(&[b[0] ^ 0x80], 200 * 4096 + 17).unwrap();
    drop(file);
    let e = kiln_verify(&data, &hash, &f.root_hash).unwrap_err();
    assert!(e.to_string().contains("data block 200"), "{e}");
    let out = run(Command::new(require_tool("veritysetup"))
        .arg("verify")
        .arg(&data)
        .arg(&hash)
        .arg(f.root_hash_hex()));
    assert!(
        !out.status.success(),
        "veritysetup accepted a flipped data byte"
    );

    // A wrong root hash is caught even when the tree is self-consistent.
    let mut wrong = f.root_hash;
    wrong[0] ^= 1;
    let e = kiln_verify(&data, &hash, &wrong).unwrap_err();
    assert!(matches!(
        e,
        VerityError::Mismatch { .. } | VerityError::RootMismatch { .. }
    ));
}
